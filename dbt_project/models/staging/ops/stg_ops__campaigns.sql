with

source as (

    select * from {{ source('ops', 'campaigns') }}

),

renamed as (

    select
        campaign_id,
        name as campaign_name,
        kind as campaign_kind,
        status as campaign_status,
        sender_id,
        segment as segment_definition,
        trigger_event,
        test_fraction,
        holdout_fraction,
        test_of as test_of_campaign_id,
        test_of is not null as is_test_send,
        cast(scheduled_at as timestamp) as scheduled_at,
        cast(created_at as timestamp) as created_at,
        cast(launched_at as timestamp) as launched_at,
        cast(finished_at as timestamp) as finished_at

    from source

)

select * from renamed
